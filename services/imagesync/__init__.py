"""The imagesync service: registry push notifications replicate images across datacenters."""

__all__: list[str] = []
