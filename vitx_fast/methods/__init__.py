"""Explanation methods; importing this package registers them."""
