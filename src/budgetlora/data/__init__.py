"""Reading text data: file formats (CSV, JSON lines, Parquet, pickled Datasets, the Hub), labelled
splits and their checks, augmentation, and batching by length."""
