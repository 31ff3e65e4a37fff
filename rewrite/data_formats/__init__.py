"""Readers for data formats other than dlrm's .npz; ``rewrite.data.open`` picks one."""
