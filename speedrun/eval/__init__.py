"""speedrun.eval"""
