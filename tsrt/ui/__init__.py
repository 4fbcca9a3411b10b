"""The clinical web UI (`tsrt ui`, needs the `ui` extra: pip install 'tsrt[ui]').

`app.py` is the Streamlit page; the other modules hold its logic in plain Python/numpy so it can be
tested without a browser. Importing this package imports nothing heavy (no Streamlit).
"""
