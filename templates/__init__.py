"""Data, not code: the templates shipped with gateway.

pyproject.toml packages this folder as `gateway.templates` so that importlib.resources
finds it both in an editable install (here) and in an installed wheel
(site-packages/gateway/templates); gateway/config.py, BUILTIN_TEMPLATES. A copy made for
`[templates] directory` does not need this file.
"""
