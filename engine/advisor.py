"""Advisor: decision matrix, feasibility, ranking, explanations. (being written)"""


def register_cli(sub) -> None:
    pass
