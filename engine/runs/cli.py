"""``python -m engine run|runs``. (being written)"""


def register(sub) -> None:
    pass
