"""vqtool on Ray Data: `TokenizeBatch` for pipelines of your own, and `vqtool encode --engine ray`.

    import ray.data
    from vqtool.ray import TokenizeBatch
    ds = ray.data.read_images("images/", include_paths=True, mode="RGB")
    ds = ds.map_batches(TokenizeBatch, fn_constructor_kwargs={"model": "export"}, concurrency=4, batch_size=256)

Needs the `ray` extra (ray, pyarrow); importing this package does not import Ray itself.
"""

from vqtool.ray.batch import TokenizeBatch

__all__ = ["TokenizeBatch"]
