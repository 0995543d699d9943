"""mmdet-wandb: the command line and the service's data directory."""
