"""Regenerate the docs made from the code: the same as `make docs` or `python -m shared.apidocs`.

Writes docs/api/asyncapi.json, docs/api/openapi-<service>.json and docs/configuration.md; with
`--check` it only reports files that are out of date. The generator itself is shared/apidocs.py.
"""

import sys

from shared.apidocs import main

if __name__ == "__main__":
    sys.exit(main())
