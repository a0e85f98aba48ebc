"""Fast ops, each in its own folder beside its plain torch reference (torch; triton and
fla-core optional).

Each folder's `__init__.py` is its dispatcher, and every dispatcher asks `dispatch.use_triton`
(device, dtype, whether gradients are needed) -- one rule for all of them."""
