"""Jinja templates of the model cards erasus-hf writes (package data; see `erasus_hf.hub.card`)."""
