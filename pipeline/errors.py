class PipelineError(Exception):
    """An error the user can fix (bad config, missing data, missing upstream artifact, corrupt
    file): the CLI prints its one-line message and exits with `exit_code` (2; 130 for Ctrl-C)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
