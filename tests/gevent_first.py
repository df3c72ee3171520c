"""A pytest plugin loaded before every other (`-p tests.gevent_first` in pyproject.toml): gevent's patching.

Installed plugins (anyio's, schemathesis') import ssl and urllib3 when pytest
loads them, before any conftest runs; patching after that leaves those modules
unpatched (gevent's MonkeyPatchWarning). Loaded with `-p`, this module runs first.
"""

from gevent import monkey

monkey.patch_all()
