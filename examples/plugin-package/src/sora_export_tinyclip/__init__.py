"""sora-export-tinyclip: an example third-party plugin package for sora-export.

Two plugins, registered through the ``sora_export`` entry-point group:

- ``tinyclip`` (:mod:`sora_export_tinyclip.plugin`): a CLIP-style text encoder component;
- ``clamp-activations`` (:mod:`sora_export_tinyclip.clamp`): a transform that clamps the
  encoder's layer outputs for fp16 headroom.
"""

__version__ = "0.1.0"
