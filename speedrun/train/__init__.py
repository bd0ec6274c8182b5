"""speedrun.train"""
