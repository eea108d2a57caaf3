"""From network output to instances: sliding-window inference and post-processing (waterz, watershed)."""
