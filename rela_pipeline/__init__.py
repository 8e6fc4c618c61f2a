"""rela-pipeline: offline ReLA pipeline producing prior representations in WebDataset shards."""

__version__ = "0.1.0"
