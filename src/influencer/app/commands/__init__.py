"""The ``influencer`` commands: each a short sequence of the shared steps (:mod:`influencer.app.steps`)."""
