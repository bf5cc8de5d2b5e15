"""The paper's uses of influence as library methods; each takes a fitted :class:`~influencer.Influence`."""
