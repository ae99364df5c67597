"""The Gradio training tab (no training logic; see ``tab.py``)."""
