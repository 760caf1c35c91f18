import os

PathLike = str | os.PathLike[str]
