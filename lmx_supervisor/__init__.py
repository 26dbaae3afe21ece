"""LMX supervisor: owns worker processes and the models they serve."""
