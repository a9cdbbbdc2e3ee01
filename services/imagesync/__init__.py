"""The imagesync service."""
