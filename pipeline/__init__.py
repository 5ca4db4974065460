"""asvr.pipeline"""
