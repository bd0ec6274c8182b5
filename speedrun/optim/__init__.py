"""speedrun.optim"""
