"""The one error the entry points turn into a line and exit status 2 (checkpoint.command_line).
Its own module, so that dist.py, which checkpoint.py imports, can raise it too."""


class Refused(Exception):
    """Bad input, said in one line that names the file and the problem. Every entry point (train.py,
    eval.py, bench.py, each torchrun rank of train.py) prints it on stderr and exits with status 2;
    nothing in out/ has been written when it is raised. An Exception, not a SystemExit: a caller
    that runs a stage from Python can catch it."""
