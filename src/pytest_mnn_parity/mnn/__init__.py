"""Everything that talks to MNN: the import, models, backends, the session and Module API runners."""
