from .cases import CaseDataModule
from .text import TextDataModule

__all__ = ["CaseDataModule", "TextDataModule"]
