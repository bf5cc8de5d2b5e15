"""Progress bars of long steps (tqdm), silenced by ``progress=False``."""

from influencer._kernel.progress import duration_text, progress_bar

__all__ = ["duration_text", "progress_bar"]
