"""The parts of :class:`dvemb.Recorder`, one concern a module; the recorder (:mod:`dvemb.recorder`) wires them.

Private implementation modules: users import ``dvemb.Recorder``; nothing here is public API.

- :mod:`~dvemb.recording.modes`: the string options as ``StrEnum`` s (curvature, projection, dtype, ...) and
  :func:`~dvemb.recording.modes.choose`, which accepts the strings users pass.
- :mod:`~dvemb.recording.layer_set`: which modules are recorded, their adapters and projections, tied weights.
- :mod:`~dvemb.recording.hooks`: the per-layer forward and output-gradient hooks and what they capture per step.
- :mod:`~dvemb.recording.curvature_rows`: the Gauss-Newton rows of ggn steps, found at the model's output or
  given with ``rec.curvature``.
- :mod:`~dvemb.recording.bases`: the projection bases, fitted by ``rec.calibrate`` or on the held first steps.
- :mod:`~dvemb.recording.steps`: step bookkeeping: ids, the optimizer's values, losses, the rows of a step
  checked and handed to the writer.
- :mod:`~dvemb.recording.queries`: ``rec.record_queries``.
- :mod:`~dvemb.recording.metadata`: ``rec.describe``'s example records.
- :mod:`~dvemb.recording.ids` and :mod:`~dvemb.recording.batches`: example ids as users give them, and the
  model's output and default loss on a user's batch.

The dependencies run one way: modes, ids, batches <- layer_set <- hooks <- curvature_rows <- bases <- steps;
queries and metadata use the first few; only :mod:`dvemb.recorder` sees them all.
"""
