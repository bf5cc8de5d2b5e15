"""Optional dependencies: which extra installs a missing package, in one line (see
:mod:`influencer._kernel.extras`)."""

from influencer._kernel.extras import MissingExtraError, missing, missing_message, require

__all__ = ["MissingExtraError", "missing", "missing_message", "require"]
