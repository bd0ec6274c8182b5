"""speedrun.data"""
