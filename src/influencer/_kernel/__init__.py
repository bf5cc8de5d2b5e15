"""The engine (private): what every other part of influencer is built on.

* :mod:`.task` the Task protocol (per-example loss, measurement, regulariser) and built-in tasks;
* :mod:`.data` random access to a user's data in chunks;
* :mod:`.functional` model + task as functions of flat parameters: per-example gradients, HVPs;
* :mod:`.curvature` the Hessian / Gauss-Newton operator on blocks of vectors;
* :mod:`.layers` the supported layers (Linear, Conv2d, Conv1D) and hooks capturing their rows;
* :mod:`.scores` the sign convention and the 1/n scale, stated once;
* :mod:`.distributed` splitting work between torch.distributed ranks;
* :mod:`.errors`, :mod:`.progress`, :mod:`.stats`, :mod:`.losses` small shared pieces.

Nothing here imports from the floors above (estimators, samplers, Influence, uses, plotting, app).
Users reach these names through :mod:`influencer`, :mod:`influencer.tasks`, :mod:`influencer.data`
and :mod:`influencer.errors`.
"""
