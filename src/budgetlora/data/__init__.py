"""Reading text data: file formats (CSV, TSV, JSON lines, Parquet, pickled Datasets, the Hub),
labelled splits and their checks, augmentation, and tokenizing (cached) and batching by length."""
