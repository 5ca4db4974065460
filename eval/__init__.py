"""asvr.eval"""
