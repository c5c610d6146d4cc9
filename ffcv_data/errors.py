"""The data package's one exception: bad input data a user can fix (malformed annotations, missing
or corrupt images, empty splits, a folder not prepared yet). Its message names the file and record.
pml_dist's CLI reports it like its own errors: one line, exit status 2."""


class DataError(Exception):
    """Bad or missing input data; the message names the file and record at fault."""
