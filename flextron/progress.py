"""Progress bars on stderr, so stdout stays for the one-line JSON summary."""

import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, **kw):
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)
