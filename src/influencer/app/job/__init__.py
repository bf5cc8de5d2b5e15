"""The job: a trained model with its task and data, its checks, its features and its evaluation."""
