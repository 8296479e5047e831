"""The toy world: procedural captioned scenes with masks, oracle metrics, caption-match.

Modules: `vocabulary` (caption words), `world` (scene sampling, rendering,
caption grammar), `dataset` (in-memory batches and versionable directories),
`oracle` (color / layout / detail / lighting scores), `caption_match`
(caption fidelity measured with the toy segmenter of `unifl.models.segmenter`).
Import the modules themselves; this package imports nothing heavy.
"""
