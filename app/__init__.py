"""Gradio demo: dense vs sparse side by side."""
