"""Former name of :mod:`abs_llm.hub` (model card and Hub upload), kept so ``abs_llm.io.write_model_card`` still works."""

from .hub import prepare_upload, push, write_model_card  # noqa: F401
