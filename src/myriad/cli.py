"""The ``myriad`` command (placeholder until the sub-commands land)."""


def main(argv: list[str] | None = None) -> int:
    return 0
