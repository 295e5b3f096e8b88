class PipelineError(Exception):
    """An error the user can cause (bad config, missing data or artifact, corrupt
    file). The CLI prints its message and exits non-zero, without a traceback."""
