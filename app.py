"""tunequant dashboard: ``python app.py [--host H] [--port P]`` (also the Hugging Face Spaces app_file).

Binds 127.0.0.1 unless ``--host`` or ``GRADIO_SERVER_NAME`` says otherwise, or the app runs on
a Space (``SPACE_ID`` set: 0.0.0.0). Starting it imports no torch, transformers, peft,
bitsandbytes, torchao or gptqmodel: runs start in their own worker process.
"""
from __future__ import annotations

import argparse
import os
import sys


def server_name(cli_host: str | None = None) -> str:
    if cli_host:
        return cli_host
    if os.environ.get("GRADIO_SERVER_NAME"):
        return os.environ["GRADIO_SERVER_NAME"]
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"


def server_port(cli_port: int | None = None) -> int:
    if cli_port:
        return int(cli_port)
    return int(os.environ.get("GRADIO_SERVER_PORT") or 7860)


def build():
    from ui.layout import build_app
    return build_app()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python app.py", description="tunequant dashboard")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 on a Space)")
    p.add_argument("--port", type=int, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    args = p.parse_args(argv)
    from ui.layout import LAUNCH_KW
    demo = build()
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=server_name(args.host), server_port=server_port(args.port), show_error=False,
                footer_links=["gradio"], **LAUNCH_KW)
    return 0


if __name__ == "__main__":
    sys.exit(main())
