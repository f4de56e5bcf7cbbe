"""The one error the entry points turn into a line and exit status 2 (checkpoint.command_line).
Its own module, so that dist.py, which checkpoint.py imports, can raise it too."""


class Refused(SystemExit):
    """Bad input, said in one line that names the file and the problem. The entry points print it
    and exit with status 2; nothing in out/ has been written when it is raised."""
