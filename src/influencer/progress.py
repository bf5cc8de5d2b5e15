"""Progress bars of long steps (tqdm), silenced by ``progress=False``."""

from influencer._kernel.progress import progress_bar

__all__ = ["progress_bar"]
