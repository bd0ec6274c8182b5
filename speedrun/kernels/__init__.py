"""speedrun.kernels"""
