"""speedrun.model"""
