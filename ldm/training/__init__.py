"""Pieces of a training run that are not a model: config resolvers, callbacks, the run's set-up."""
