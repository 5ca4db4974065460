"""asvr.train"""
