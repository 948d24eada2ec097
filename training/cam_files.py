"""Moved to :mod:`hsc.core.cam_files` (the workers write the same files); re-exported here so that
``from hsc.training.cam_files import ...`` keeps working."""

from hsc.core.cam_files import CAM_FORMAT_VERSION, atomic_write_bytes, cam_dict, load_cams, save_cams

__all__ = ["CAM_FORMAT_VERSION", "atomic_write_bytes", "cam_dict", "load_cams", "save_cams"]
