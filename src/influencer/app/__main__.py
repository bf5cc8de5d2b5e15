"""``python -m influencer.app``: the ``influencer`` command."""

from influencer.app.entry import main

main()
