from .text import TextDataModule

__all__ = ["TextDataModule"]
